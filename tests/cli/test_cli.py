"""The ``ddsnet`` CLI end to end on real photos from skimage.data, with the tiny random checkpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from model import Gate, GateConfig, SlimUNet, Subnet, save_checkpoint
from service.cli import main
from tests.conftest import TINY, randomize, tiny_subnets
from tests.model.test_checkpoint import hostile_checkpoint, set_field
from tests.service.conftest import MALFORMED_PNG


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()[100:220, 150:310]).save(path)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("quality", ["auto", "fast", "best"])
def test_denoise_one_photo_with_json(capsys, tiny_checkpoint, astronaut_png, tmp_path, quality):
    out = tmp_path / "clean.png"
    code, stdout, _ = run_cli(capsys, "denoise", str(astronaut_png), "-o", str(out), "--checkpoint",
                              tiny_checkpoint, "--quality", quality, "--json")
    assert code == 0
    record = json.loads(stdout)
    assert record["input"] == str(astronaut_png) and record["output"] == str(out)
    assert record["subnet"] in (0, 1, 2)
    if quality == "best":
        assert record["subnet"] == 0
    if quality == "fast":
        assert record["subnet"] == 2
    assert record["mflops_per_pixel"] > 0 and record["seconds"] > 0
    with Image.open(out) as result, Image.open(astronaut_png) as source:
        assert result.size == source.size and result.mode == "RGB"
        assert not np.array_equal(np.asarray(result), np.asarray(source))


def test_auto_reports_the_gate_cost_on_top_of_the_network(capsys, tiny_checkpoint, astronaut_png, tmp_path):
    from model import Denoiser, gate_macs, load_checkpoint
    from service.imaging import decode_image

    _, stdout, _ = run_cli(capsys, "denoise", str(astronaut_png), "-o", str(tmp_path / "auto.png"),
                           "--checkpoint", tiny_checkpoint, "--quality", "auto", "--json")
    record = json.loads(stdout)
    denoiser = Denoiser(load_checkpoint(tiny_checkpoint))
    noisy = decode_image(astronaut_png.read_bytes()).rgb
    _, network_macs = denoiser.run(noisy, record["subnet"])
    expected = 2 * (network_macs + gate_macs(denoiser.gate.config, *noisy.shape[-2:]))
    assert record["gflops"] == round(expected / 1e9, 3)
    assert record["mflops_per_pixel"] == round(expected / noisy.shape[-1] / noisy.shape[-2] / 1e6, 6)


def test_several_inputs_go_to_a_folder_and_bad_ones_do_not_stop_the_rest(capsys, tiny_checkpoint, astronaut_png,
                                                                         tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(data.camera()[:64, :80]).save(grey)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(astronaut_png.read_bytes()[:2000])
    folder = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "denoise", str(astronaut_png), str(tmp_path / "missing.png"),
                                   str(not_image), str(truncated), str(grey), "-o", str(folder),
                                   "--checkpoint", tiny_checkpoint, "--json")
    assert code != 0
    errors = stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "missing.png" in errors[0] and "notes.png" in errors[1] and "cut.png" in errors[2]
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["output"] for r in records] == [str(folder / "astronaut.png"), str(folder / "grey.png")]
    with Image.open(folder / "grey.png") as result:
        assert result.mode == "L" and result.size == (80, 64)


def test_outputs_that_would_collide_or_overwrite_an_input_are_refused_before_any_work(capsys, tiny_checkpoint,
                                                                                      astronaut_png, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    first.write_bytes(astronaut_png.read_bytes())
    second.write_bytes(astronaut_png.read_bytes())
    folder = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "denoise", str(first), str(second), "-o", str(folder),
                                   "--checkpoint", tiny_checkpoint)
    assert code == 2 and stdout == ""
    assert "would both be written to" in stderr and str(folder / "x.png") in stderr
    assert not folder.exists()
    # Writing into the inputs' own folder would replace x.png with its denoised self: refused, input intact.
    other = tmp_path / "a" / "y.png"
    other.write_bytes(astronaut_png.read_bytes())
    code, _, stderr = run_cli(capsys, "denoise", str(first), str(other), "-o", str(tmp_path / "a"),
                              "--checkpoint", tiny_checkpoint)
    assert code == 2 and "would overwrite the input" in stderr
    assert first.read_bytes() == astronaut_png.read_bytes()


def test_alpha_passes_through_untouched(capsys, tiny_checkpoint, tmp_path):
    rgba = np.dstack([data.astronaut()[:40, :56], np.tile(np.arange(56, dtype=np.uint8) * 4, (40, 1))])
    source = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(source)
    out = tmp_path / "rgba.out.png"
    assert run_cli(capsys, "denoise", str(source), "-o", str(out), "--checkpoint", tiny_checkpoint)[0] == 0
    with Image.open(out) as result:
        assert result.mode == "RGBA"
        assert np.array_equal(np.asarray(result)[..., 3], rgba[..., 3])


def test_exif_orientation_is_applied(capsys, tiny_checkpoint, tmp_path):
    source = tmp_path / "rotated.jpg"
    image = Image.fromarray(data.astronaut()[:48, :80])
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(source, exif=exif)
    out = tmp_path / "rotated.png"
    assert run_cli(capsys, "denoise", str(source), "-o", str(out), "--checkpoint", tiny_checkpoint)[0] == 0
    with Image.open(out) as result:
        assert result.size == (48, 80)


def test_sixteen_bit_grey_keeps_sixteen_bits_and_sixteen_bit_colour_is_refused(capsys, tiny_checkpoint, tmp_path):
    grey16 = tmp_path / "grey16.png"
    values = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(values).save(grey16)
    out = tmp_path / "grey16.out.png"
    assert run_cli(capsys, "denoise", str(grey16), "-o", str(out), "--checkpoint", tiny_checkpoint)[0] == 0
    with Image.open(out) as result:
        array = np.asarray(result)
        assert result.mode.startswith("I") and array.max() > 255
        assert len(np.unique(array)) > 256

    rgb16 = tmp_path / "rgb16.png"
    rgb16.write_bytes(_png_rgb16(8, 8))
    code, _, stderr = run_cli(capsys, "denoise", str(rgb16), "-o", str(tmp_path / "x.png"), "--checkpoint",
                              tiny_checkpoint)
    assert code != 0 and "16-bit" in stderr


def _png_rgb16(width: int, height: int) -> bytes:
    """A valid 16-bit RGB PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(range(6)) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_missing_checkpoint_says_how_to_make_one(capsys, astronaut_png, tmp_path):
    code, _, stderr = run_cli(capsys, "denoise", str(astronaut_png), "--checkpoint", str(tmp_path / "none.st"))
    assert code == 2 and "checkpoint not found" in stderr
    assert "ddsnet-train supernet && ddsnet-train tailor && ddsnet-train gate" in stderr


def test_info_json(capsys, tiny_checkpoint):
    code, stdout, _ = run_cli(capsys, "info", "--checkpoint", tiny_checkpoint, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert len(info["subnets"]) == 3
    assert {"widths", "mflops_per_pixel", "val_psnr"} <= set(info["subnets"][0])
    assert info["subnets"][0]["mflops_per_pixel"] > info["subnets"][2]["mflops_per_pixel"]
    assert info["gate_mflops_per_pixel"] > 0


def test_info_table(capsys, tiny_checkpoint):
    code, stdout, _ = run_cli(capsys, "info", "--checkpoint", tiny_checkpoint)
    assert code == 0 and "MFLOPs/px" in stdout and "widths:" in stdout


def test_info_table_leaves_blank_the_noises_a_profile_was_not_validated_on(capsys, tmp_path):
    white, compressed = randomize(SlimUNet(TINY)), randomize(SlimUNet(TINY), seed=5)
    rows = tiny_subnets(white)
    subnets = rows + [Subnet(s.widths, s.mflops_per_pixel, {"25": 29.5, "jpeg80-awgn15": 28.25}, "compressed")
                      for s in rows]
    path = tmp_path / "two-profiles.safetensors"
    save_checkpoint(path, {"white": white, "compressed": compressed},
                    Gate(GateConfig(num_subnets=6, noise_stats=True, profiles=(0, 0, 0, 1, 1, 1))), subnets,
                    gate_trained=False)
    code, stdout, _ = run_cli(capsys, "info", "--checkpoint", str(path))
    lines = [line.split() for line in stdout.splitlines() if line.lstrip()[:1].isdigit()]
    assert code == 0 and "nan" not in stdout and stdout.splitlines()[2].split()[-1] == "PSNR@jpeg80-awgn15"
    assert lines[0][1:2] == ["white"] and lines[0][-2:] == ["30.00", "-"]
    assert lines[3][1:2] == ["compressed"] and lines[3][-2:] == ["29.50", "28.25"]


def test_help_lists_only_denoise_info_serve_and_cache(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    usage = re.search(r"\{([\w,-]+)\}", capsys.readouterr().out)
    assert usage.group(1).split(",") == ["denoise", "info", "serve", "cache"]


def test_importing_the_cli_does_not_import_the_training_code():
    result = subprocess.run([sys.executable, "-c", "import service.cli, sys; print('training' in sys.modules)"],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_console_script_is_installed(tiny_checkpoint):
    executable = shutil.which("ddsnet") or str(Path(sys.executable).with_name("ddsnet"))
    result = subprocess.run([executable, "info", "--checkpoint", tiny_checkpoint, "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["subnets"]) == 3


def test_the_cli_reports_a_malformed_file_and_goes_on_to_the_next(tiny_checkpoint, tmp_path, astronaut_png, capsys):
    bad, good = tmp_path / "t.png", tmp_path / "good.png"
    bad.write_bytes(MALFORMED_PNG)
    good.write_bytes(astronaut_png.read_bytes())
    code = main(["denoise", str(bad), str(good), "-o", str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
                 "--tile", "64"])
    assert code == 1
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "t.png").exists()
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}")


@pytest.mark.parametrize("command", ["info", "serve"])
def test_info_and_serve_refuse_a_bad_checkpoint_with_one_line(tiny_checkpoint, tmp_path, capsys, command):
    path = hostile_checkpoint(tiny_checkpoint, tmp_path / "bad.safetensors", set_field(["model", "steps_per_width"], 0))
    assert main([command, "--checkpoint", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err + captured.out


def test_the_backend_defaults_to_the_services_setting(capsys, tiny_checkpoint, astronaut_png, tmp_path, monkeypatch):
    from service import backends

    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    monkeypatch.setenv("DDSNET_BACKEND", "openvino")
    arguments = ("denoise", str(astronaut_png), "-o", str(tmp_path / "out.png"), "--checkpoint", tiny_checkpoint)
    code, _, stderr = run_cli(capsys, *arguments)
    assert code == 2 and "backend 'openvino' is not installed" in stderr
    assert run_cli(capsys, *arguments, "--backend", "torch")[0] == 0


def test_denoise_takes_the_services_torch_threads_setting(capsys, tiny_checkpoint, astronaut_png, tmp_path,
                                                          monkeypatch):
    import torch

    from service import backends

    seen = []
    real = backends.Runtimes.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append((self.threads, torch.get_num_threads()))

    monkeypatch.setattr(backends.Runtimes, "__init__", spy)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(("set", n)))
    monkeypatch.setenv("DDSNET_TORCH_THREADS", "1")
    arguments = ("denoise", str(astronaut_png), "-o", str(tmp_path / "out.png"), "--checkpoint", tiny_checkpoint,
                 "--backend", "torch")
    assert run_cli(capsys, *arguments)[0] == 0
    assert seen[0] == ("set", 1) and seen[1][0] == 1  # torch told first, then the engines and their cache key
